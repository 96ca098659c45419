/* Error names and texts, generated from BUS_ERR_MAP (err.h). */
#include <bus/err.h>

static const struct {
    const char *name;
    const char *text;
    bool retriable;
} err_table[] = {
    {"BUS_OK", "success", false},
#define BUS_ERR_ROW(n, r, t) {"BUS_" #n, t, r},
    BUS_ERR_MAP(BUS_ERR_ROW)
#undef BUS_ERR_ROW
};

#define ERR_N (int)(sizeof(err_table) / sizeof(err_table[0]))

const char *
bus_strerror(int err)
{
    return err >= 0 && err < ERR_N ? err_table[err].text : "unknown error";
}

const char *
bus_err_name(int err)
{
    return err >= 0 && err < ERR_N ? err_table[err].name : "BUS_E?";
}

bool
bus_err_retriable(int err)
{
    return err > 0 && err < ERR_N && err_table[err].retriable;
}

const char *
bus_version(void)
{
#define BUS_STR2(x) #x
#define BUS_STR(x) BUS_STR2(x)
    return BUS_STR(BUS_VERSION_MAJOR) "." BUS_STR(BUS_VERSION_MINOR) "."
        BUS_STR(BUS_VERSION_PATCH);
}
