"""Running Corral as a systemd service: the unit and its environment file (`unit`, pure) and
installing them (`install`). Below everything else: it knows Corral's commands only as words."""
