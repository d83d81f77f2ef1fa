"""`specbatch bench`: peers side by side on the same model, prompts and settings."""
