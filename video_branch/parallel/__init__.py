"""Process groups and sequence-parallel attention."""
