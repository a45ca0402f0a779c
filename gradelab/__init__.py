"""gradelab: release, grade, report and export an auto-graded PyTorch assignment."""
