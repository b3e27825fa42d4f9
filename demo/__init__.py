"""The ticket-triage demo: one user of the executor runtime (corpus, MiniLM models, stand-ins, load)."""
