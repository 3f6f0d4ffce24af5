"""Attack tests: an active man in the middle, hostile peers, resource exhaustion and load."""
