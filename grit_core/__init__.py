"""What the GRIT pipeline and kosmos share: the GRIT record format (:mod:`grit_core.record`), typed YAML config
loading (:mod:`grit_core.config`), durable file writes (:mod:`grit_core.durable`) and subcommand dispatch
(:mod:`grit_core.cli`). It imports neither app, and needs only pyarrow and PyYAML.
"""
