/* being written: typed codec */ typedef int type_placeholder_;
