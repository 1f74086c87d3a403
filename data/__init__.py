"""The two tasks' data: readers for the course's files, prompts, batches with loss masks, and downloads.

Data files live here, beside this code, under the course's names (data/quora-train.csv, data/sonnets.txt, ...);
`python -m data.download` fetches them and git ignores them.
"""
