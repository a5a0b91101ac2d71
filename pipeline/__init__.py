"""The pipeline layer: params, tracking, lineage, launcher and CLI (imports point stages -> pipeline -> cofi)."""
