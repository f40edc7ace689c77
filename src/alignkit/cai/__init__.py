"""Constitutional AI: the constitution, SL-CAI critique and revision, and AI-feedback labels (to come)."""
