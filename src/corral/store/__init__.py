"""State that outlives a command: registrations, the last known view, events (embedded or Redis)."""
