"""Request handlers: thin, each parses its input, does its one thing and answers in JSON."""
