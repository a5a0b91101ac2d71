"""One module per DVC stage; ``run`` is the stage (pipeline.stage_cli looks it up by name)."""
