"""State that outlives a command: registrations, the last known view, events (embedded or Redis).

`open_store` (factory.py) picks the implementation; base.py is the interface; codec.py is the one
strict reader every stored value goes through.
"""
