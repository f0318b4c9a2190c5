"""NLP recipe: FISH-Tuning and FISH Mask on all-MiniLM-L6-v2 with Rotten Tomatoes reviews, all offline."""
