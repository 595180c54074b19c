"""Device meshes and partition rules."""
