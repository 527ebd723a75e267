"""Ops of varkernels: one module per op (token op, weights, VAR loss)."""
