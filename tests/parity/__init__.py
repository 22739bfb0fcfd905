"""The frozen parity suite (issue 13, "Freeze first"): today's outputs of every lsa method, kept to check a refactor."""
