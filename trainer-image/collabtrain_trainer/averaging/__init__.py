"""Averaging among the live peers: process groups per membership epoch and the compressed
exchange that runs over them (`averaging.exchange`)."""
