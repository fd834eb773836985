"""The five attention-centred methods (and the baseline). Each turns a bundle into a plain bundle."""
