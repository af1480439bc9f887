"""Discovery sources, one module each; each yields sightings through the endpoint gate."""
