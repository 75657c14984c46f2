"""Everything that imports ray: worker actors, distributed setup, the EPLB actor, the Serve app."""
