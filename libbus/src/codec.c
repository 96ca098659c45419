/* being written: envelope codec */ typedef int codec_placeholder_;
