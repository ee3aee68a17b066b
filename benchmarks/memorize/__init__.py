"""Memorising Shakespeare into a memory pack and reading the held-out plays (results/memorize/)."""
