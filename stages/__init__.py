"""One module per DVC stage; ``run`` is the stage (pipeline.cli looks it up by name)."""
