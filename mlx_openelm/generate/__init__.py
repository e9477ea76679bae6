"""Generation: sampling options, streaming (plain, speculative, prompt lookup), chat sessions."""
