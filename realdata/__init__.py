"""Real dialogue corpora: the MG-ShopDial and MultiWOZ 2.2 loaders (corpora.py) and a world made of
logged dialogues (logged.py), for `train.py --data mgshop|multiwoz`."""
