"""The reader study: a blinded offline packet, strict ingestion of the reads, and their statistics."""
