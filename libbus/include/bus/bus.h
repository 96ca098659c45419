/*
 * libbus: the umbrella header. Including <bus/bus.h> gives the whole public
 * API of the core: errors, logging, events, the envelope codec and typed
 * events. (The bus context, subscriptions and brokers join it with the bus
 * issue; the store and outbox have their own headers.)
 */
#ifndef BUS_BUS_H
#define BUS_BUS_H

#include <bus/common.h>
#include <bus/err.h>
#include <bus/log.h>
#include <bus/event.h>
#include <bus/codec.h>
#include <bus/type.h>
#include <bus/handler.h>

#endif /* BUS_BUS_H */
