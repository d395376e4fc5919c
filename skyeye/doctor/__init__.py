"""`skyeye doctor`: which backend each part of the platform uses and whether it answers."""
