"""A request's prompt -> token ids: validation, chat templates, tools in the prompt, tokenizing reused prefixes."""
