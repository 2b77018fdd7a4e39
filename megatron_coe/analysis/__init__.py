"""Post-hoc analysis of trained CoE checkpoints (routing statistics, held-out loss)."""
