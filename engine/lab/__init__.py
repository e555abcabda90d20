"""The Transfer Lab: experiments that show what pretraining buys, the strategy advisor, unsupervised pretraining."""
