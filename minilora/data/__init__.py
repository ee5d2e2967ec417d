"""What training and evaluation read: record formats, chat messages, chat templates, the
tokenizer, SFT samples, task files."""
