"""`dlora attack`: what a curious cloud recovers from what it records (docs/privacy.md)."""
