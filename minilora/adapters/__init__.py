"""Adapters on disk: the adapter folder (load and save), PEFT's and MiniMind's file formats,
in-memory names mapped to file keys."""
