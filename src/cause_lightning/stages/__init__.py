"""Running the stages on Lightning: the run context, the builders of data, modules and trainers,
the steps that hand artifacts on (mediator -> head -> probe -> eval), import and predict, and
the training machinery (resume checkpoints, callbacks, precision, tensor sharing)."""
