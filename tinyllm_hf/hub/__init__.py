"""Releases: model and dataset cards, push to the Hugging Face Hub."""
