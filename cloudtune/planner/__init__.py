"""The planner: memory, time and cost of a fine-tuning job, and the cheapest offer that fits."""
