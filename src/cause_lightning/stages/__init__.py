"""The CAUSE stages on Lightning: the run context, the builders of data, modules and trainers, and
the four steps that hand artifacts on (mediator -> head -> probe -> eval)."""
