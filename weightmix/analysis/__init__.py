"""Looking at models before and after a merge: similarity per block and component."""
