"""The whole recipe in one command: tokenizer -> data -> pretrain -> SFT -> eval -> report card."""
