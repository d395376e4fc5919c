"""Prefect flows: thin wiring over the `skyeye` library."""
