"""Entry-point code: what only the command lines do (the dry run)."""
