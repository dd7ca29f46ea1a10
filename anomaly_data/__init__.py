"""Datasets: MVTec AD, VisA and folder readers, the synthetic generator, the validation set."""

from anomaly_data.datasets import ArrayDataset, load_records
from anomaly_data.folder import read_folder, read_folder_root
from anomaly_data.io import read_image, read_mask
from anomaly_data.mvtec import read_mvtec
from anomaly_data.records import ClassRecords, DatasetError, ImageRecord
from anomaly_data.splits import DATASET_KINDS, Splits, prepare_splits, read_dataset
from anomaly_data.validation import build_validation_set, split_train_validation
from anomaly_data.visa import read_visa

__all__ = ["ArrayDataset", "ClassRecords", "DATASET_KINDS", "DatasetError", "ImageRecord", "Splits",
           "build_validation_set", "load_records", "prepare_splits", "read_dataset", "read_folder",
           "read_folder_root", "read_image", "read_mask", "read_mvtec", "read_visa", "split_train_validation"]
