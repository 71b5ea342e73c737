"""The trainer: runs inside the rented machine (or locally), checkpoints to the store, resumes."""
