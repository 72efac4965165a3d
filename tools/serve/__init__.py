"""`dsv4 serve`: engine (scheduler, continuous batching), step runners, OpenAI HTTP front, metrics."""
