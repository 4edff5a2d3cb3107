"""How work is spread: Ray start/join, stage actors, the driver, MLflow tracking and the CLI.

cluster/ knows no model internals: it moves stage inputs and outputs between processes and
records what happened.
"""
