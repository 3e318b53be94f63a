"""The fleet protocol both the agent and the coordinator speak: topics, messages, codec, sealing."""
