"""The peer: joins, gets state, trains and accumulates, averages in rounds, serves its state."""
