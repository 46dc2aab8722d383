"""The applications: the ``amortized`` command, the study, the collapse study, figures."""
