"""Buses carry publications between workers and own delivery semantics: offsets, epochs,
history, presence. See :mod:`broker.bus.base` for the interface every bus implements."""
