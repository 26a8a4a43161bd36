"""Coordinator side of Confide: aggregation strategies, selection and round bookkeeping."""
